"""Some of the weights of a model packaged by nnwheel: the model's own package loads them from here."""
