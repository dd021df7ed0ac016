"""Between the two halves: the frozen-autoencoder interface, the latent cache and the latent stream."""
