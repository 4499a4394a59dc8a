"""NNX modules: the MoT decoder, the NaViT, the FLUX autoencoder, embeddings and the BAGEL composition."""
