# The app's poodle job through AppCore before (326cca1) and after (8dec4ac) the tidy-up, alternating.
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
for c in 326cca1 8dec4ac; do
  [ -d /tmp/tidy-$c ] || { git clone -q "$REPO" /tmp/tidy-$c && git -C /tmp/tidy-$c checkout -q $c; }
done
for c in 326cca1 8dec4ac 326cca1 8dec4ac; do
  echo "== $c"
  (cd /tmp/tidy-$c && python "$HERE/app_job.py" 2>&1 | grep -v "initialized partially" | tail -2)
done
