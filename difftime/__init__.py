"""difftime core: SDEs with a finite diffusion time T, losses, samplers, likelihood, priors,
analytic toy distributions and networks. Pure torch; never imports lightning."""
