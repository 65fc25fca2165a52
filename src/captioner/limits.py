"""The bounds and defaults of decoding that every front end shares (no torch here: the command line
reads them for its help, which must answer at once)."""

#: The beam every way of captioning uses unless told otherwise (Python, command line, web, evaluate).
#: On the Flickr8k dev split the shipped model scores within noise at 3 and 5 (BLEU-4 23.52 / 23.73,
#: CIDEr-D 57.19 / 57.28) and a beam of 3 decodes a batch twice as fast.
DEFAULT_BEAM_SIZE = 3
MAX_BEAM_SIZE = 100  # a wider beam costs memory and time in proportion and does not caption better
MAX_NUM_RETURN = 100  # n-best list or samples per image
MAX_LENGTH = 100  # words in a caption: decoding runs at most this many steps
MAX_LENGTH_PENALTY = 10.0
MAX_NO_REPEAT_NGRAM = 10
MAX_VOCABULARY = 1_000_000  # words in a model's vocabulary
MAX_CONSTRAINTS = 3  # per image: constrained beam search keeps 2^3 = 8 beams of k
MAX_ENSEMBLE_DECODERS = 16  # decoders of one ensemble: each costs its weights in memory and a pass per step (the shipped one has 2)
