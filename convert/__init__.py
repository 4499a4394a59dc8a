"""Command-line converters between the released safetensors and Orbax, thin over `bagel_jax.weights`.

    python -m convert.safetensors_to_orbax --src RELEASE_DIR --dst OUT_DIR [--dtype bfloat16|float32]
    python -m convert.orbax_to_safetensors --src OUT_DIR --dst DIR

Both stream one upstream tensor at a time, write into a temporary folder beside the
destination and rename it into place at the end (nothing is left at the destination if
they fail or are interrupted), show a progress bar in bytes and end with a summary line.
"""
