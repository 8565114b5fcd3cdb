"""Evaluation (``sdvae eval``) and the latent space: the eval engine, its report, ELBO bounds, prior samples."""
