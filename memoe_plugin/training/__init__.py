"""Training the bypass: batches, the fast path over frozen activations, the trainer, the output memory."""
