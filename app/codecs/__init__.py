"""Protocol codecs: each turns its wire format into an ``InferRequest`` and a result into its reply."""
