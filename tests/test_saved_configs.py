"""Saved configs keep working: sampler blocks written before ``difftime.samplers`` became a package
(``tests/fixtures/saved_sampler_configs.yaml``) instantiate by their class paths, mean what they
meant (no thresholding: the option did not exist), and new dumps name the same paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from difftime import samplers as S
from difftime.sde import VPSDE

FIXTURE = Path(__file__).parent / "fixtures" / "saved_sampler_configs.yaml"
SAVED = yaml.safe_load(FIXTURE.read_text())["samplers"]


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--sampler", type=S.Sampler)
    return p


@pytest.mark.parametrize("block", SAVED, ids=[b["class_path"].rsplit(".", 1)[-1] for b in SAVED])
def test_saved_sampler_block_instantiates_by_class_path(block):
    p = parser()
    sampler = p.instantiate(p.parse_object({"sampler": block})).sampler
    name = block["class_path"].rsplit(".", 1)[-1]
    assert type(sampler) is getattr(S, name) and type(sampler) in S.SAMPLERS.values()
    for key, value in block["init_args"].items():
        got = getattr(sampler, key)
        if isinstance(value, dict):  # an injected schedule
            assert type(got).__name__ == value["class_path"].rsplit(".", 1)[-1]
        elif key != "schedule":
            assert got == value, key
    assert getattr(sampler, "threshold", None) is None  # configs saved before thresholding sample as before
    dumped = yaml.safe_load(p.dump(p.parse_object({"sampler": block})))
    assert dumped["sampler"]["class_path"] == block["class_path"]  # the stable path, not the submodule's


def test_saved_sampler_samples_as_its_function_with_the_saved_options():
    block = SAVED[0]  # SDEDPMSolverPP, as in a score unit's config.yaml
    p = parser()
    sampler = p.instantiate(p.parse_object({"sampler": block})).sampler
    sde = VPSDE(T=1.0, eps=1e-3)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    score = lambda x, t: -x  # noqa: E731  (the score of N(0, I) at every t under VP)
    a, info = sampler(score, sde, x_T, 6, torch.Generator().manual_seed(1))
    options = {k: v for k, v in block["init_args"].items() if k != "steps"}
    b, _ = S.sde_dpm_solver_pp(score, sde, x_T, 6, torch.Generator().manual_seed(1), **options)
    assert torch.equal(a, b) and info["nfe"] == 7
