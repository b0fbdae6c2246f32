# %% [markdown]
# # difftime in five lines
# Load a trained run, draw 16 digits with a chosen sampler and prior, look at them, and compute
# bits/dim on a few test images. A jupytext "percent" script: open it as a notebook with
# `jupytext --to notebook examples/notebook.py`, or run it as it is:
#
#     python examples/notebook.py runs/quickstart/default/checkpoints/last.ckpt [out.png]

# %%
import sys

import torch

from commands.runs import load_run
from commands.sampling import real_images
from difftime.render import render
from difftime.samplers import DPMSolverPP

CKPT = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/default/checkpoints/last.ckpt"
OUT = sys.argv[2] if len(sys.argv) > 2 else "notebook_samples.png"

# %% The five lines (prior="gaussian" or an auxiliary-prior checkpoint, eval_T=0.4 to truncate)
model, data = load_run(CKPT)
x, info = model.sample(16, generator=torch.Generator().manual_seed(0), sampler=DPMSolverPP(steps=10))
images = model.to_images(x)  # uint8 [16, C, H, W]: sample() returns model-space values
render(images, nrow=4, caption=f"{info['sampler']} | NFE {info['nfe']} | prior {info['prior']}").save(OUT)
bpd = model.bits_per_dim(real_images(data, 8), generator=torch.Generator().manual_seed(0))

# %% In a notebook, show the grid with IPython.display.Image(OUT)
print(f"wrote {OUT}: {len(images)} samples, {info['sampler']}, NFE {info['nfe']}, prior {info['prior']}")
print(f"bits/dim on 8 test images: {bpd.mean():.3f} +- {bpd.std() / len(bpd) ** 0.5:.3f} (ELBO, one draw each)")
