"""Jobs: the training and evaluation callables and the submit command's logic."""
