"""visual_tokenizers: discrete visual tokenizers (VQ, LFQ/BSQ, dual codebook) and MaskGIT
generators in JAX/Flax.

This checkout is the package: its folders are `visual_tokenizers.core`, `.models`,
`.tokenizers`, `.trained`, `.jobs` and `.configs`. `pip install -e .` installs it under that
name; scripts inside the checkout (run.py, tests, benchmarks) import it through
`this_checkout.use()` without installing. Under its own name it lives beside Hugging Face's
`tokenizers` in one process.
"""
