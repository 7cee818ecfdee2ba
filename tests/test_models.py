"""load_clip: embedded model, architectures + local checkpoints, and clear failures."""
import time

import open_clip
import pytest
import torch

from clipforget.io import save_safetensors
from clipforget.models import ModelLoadError, export_open_clip, load_clip


def _outputs(model, size, ctx=16):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    t = torch.randint(1, 100, (2, ctx))
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(t)


def test_random_rn50_saved_and_loaded_back(tmp_path):
    model, _, _ = open_clip.create_model_and_transforms("RN50", pretrained=None)
    model.eval()
    save_safetensors(model.state_dict(), tmp_path / "rn50.safetensors")
    b = load_clip("RN50", str(tmp_path / "rn50.safetensors"), device="cpu")
    assert b.image_size == 224 and b.arch == "RN50"
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in model.state_dict().items())
    for a, c in zip(_outputs(model, 224, 77), _outputs(b.model, 224, 77)):
        assert torch.allclose(a, c, atol=1e-5)    # same weights; multithreaded CPU kernels may differ in the last bits


def test_tiny_config_pt_checkpoint_weights_only(tmp_path):
    model, _, _ = open_clip.create_model_and_transforms("test-tiny-rn", pretrained=None)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    b = load_clip("test-tiny-rn", str(tmp_path / "tiny.pt"), device="cpu")
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in model.state_dict().items())
    for a, c in zip(_outputs(model, 32), _outputs(b.model, 32)):
        assert torch.allclose(a, c, atol=1e-5)    # same weights; CPU kernels may differ in the last bits


class Payload:  # a class only full unpickling can rebuild
    def __init__(self, sd):
        self.sd = sd


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    model, _, _ = open_clip.create_model_and_transforms("test-tiny-rn", pretrained=None)
    torch.save({"state_dict": model.state_dict(), "extra": Payload(1)}, tmp_path / "pickled.pt")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_clip("test-tiny-rn", str(tmp_path / "pickled.pt"), device="cpu")
    b = load_clip("test-tiny-rn", str(tmp_path / "pickled.pt"), device="cpu", allow_pickle=True)
    assert b.arch == "test-tiny-rn"


def test_wrong_architecture_is_explained(tmp_path):
    model, _, _ = open_clip.create_model_and_transforms("test-tiny-rn", pretrained=None)
    save_safetensors(model.state_dict(), tmp_path / "rn.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit architecture 'test-tiny-vit'"):
        load_clip("test-tiny-vit", str(tmp_path / "rn.safetensors"), device="cpu")


def test_no_hub_fails_fast_with_advice(monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="--pretrained /path/to"):
        load_clip("RN50", "openai", device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(ModelLoadError, match="cannot reach the model hub"):
        load_clip("RN50", "openai", device="cpu")
    assert time.perf_counter() - t0 < 30


def test_unknown_names():
    with pytest.raises(ModelLoadError, match="did you mean"):
        load_clip("RN5O", device="cpu")
    with pytest.raises(ModelLoadError, match="no pretrained tag"):
        load_clip("RN50", "nonsense-tag", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        load_clip("embedded", precision="fp8")


def test_embedded_export_loads_in_plain_open_clip(bundle, tmp_path, minilm_hub_cache):
    export_open_clip(bundle, bundle.model.state_dict(), tmp_path / "exp")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exp'}")
    plain.eval()
    ours = bundle.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in plain.state_dict().items())    # the same weights, exactly
    x = torch.rand(2, 3, 64, 64)
    tok = bundle.tokenizer(["a dog", "a cat"])
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exp'}")(["a dog", "a cat"]), tok)
    with torch.no_grad():   # outputs to 1e-5: our tower runs channels-last and its attention pool queries
        # the mean token only (towers/resnet.py), plain open_clip does neither
        assert torch.allclose(plain.encode_image(x), bundle.model.encode_image(x), atol=1e-5)
        assert torch.allclose(plain.encode_text(tok), bundle.model.encode_text(tok), atol=1e-6)
    # and by architecture name + weights path
    again, _, _ = open_clip.create_model_and_transforms(bundle.arch, pretrained=str(tmp_path / "exp" / "open_clip_model.safetensors"))
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_image(x), bundle.model.encode_image(x), atol=1e-5)


def test_padding_cut_from_hf_text_towers_changes_no_embedding(bundle):
    """The embedded model's MiniLM masks its padding: prompts are encoded without the columns that
    are padding in every row, to the same embeddings as at the full context length."""
    from clipforget.embed import tokenize
    texts = ["a dog", "a picture of a guide dog", "a poodle, a kind of dog"]
    full = bundle.tokenizer(texts)
    cut = tokenize(bundle, texts)
    assert cut.shape[1] < full.shape[1] and torch.equal(cut, full[:, :cut.shape[1]])
    assert (full[:, cut.shape[1]:] == bundle.model.text.config.pad_token_id).all()
    with torch.no_grad():
        a, b = bundle.model.encode_text(full), bundle.model.encode_text(cut)
    assert torch.allclose(a, b, atol=1e-5)
    # batched by length, returned in the caller's order: the same as one text at a time
    from clipforget.embed import encode_texts
    alone = torch.cat([encode_texts(bundle, [t]) for t in texts])
    assert torch.allclose(encode_texts(bundle, texts, batch_size=2), alone, atol=1e-5)


def test_open_clip_text_transformers_get_the_full_context():
    """open_clip's own text transformer adds positional embeddings of the whole context: no cut."""
    from clipforget.embed import tokenize
    from clipforget.models import load_clip
    tiny = load_clip("test-tiny-rn", device="cpu")
    texts = ["a dog", "a poodle"]
    assert torch.equal(tokenize(tiny, texts), tiny.tokenizer(texts))
