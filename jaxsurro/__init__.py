"""jaxsurro: online training of neural surrogates from streamed ensemble runs."""
