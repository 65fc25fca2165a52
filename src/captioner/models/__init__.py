"""Models: the pretrained encoder, attention, the decoders and the ``Captioner`` that joins them."""
