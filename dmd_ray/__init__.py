"""dmd-ray: Distribution Matching Distillation of diffusion models into one-step generators, on Ray.

The DMD core (schedule, denoiser, generator, losses, sampling, distill) is plain PyTorch and imports neither Ray
nor DeepSpeed; the Ray entry points live in jobs/ and serve/.
"""
__version__ = "0.1.0"
