"""Caption datasets, tokenizer and vocabulary, image loading, prepared folders, the shapes set."""
