"""Fast ops: autograd, dispatch and torch.library registration, one module per op family."""
