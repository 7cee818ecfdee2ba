"""clipforget: make a CLIP model forget one subgroup of images while keeping everything else."""
__version__ = "0.1.0"
