"""dmd-ray: Distribution Matching Distillation of diffusion models into one-step generators, on Ray.

Layers, each importing only those before it: method/ (the DMD maths, torch only), data/ (storage, prompts, pairs),
sd/ (diffusers teachers and generators), distributed/ (Ray Train, Ray Data), demos/ (the shapes domain, the 2D
toy, teacher training). The jobs in jobs/ and the service in serve/ sit on top.
"""
import os

__version__ = "0.1.0"

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")  # the packaged models, judge and prompts
