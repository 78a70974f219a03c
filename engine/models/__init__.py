"""Reference specs of the DiT families other than the class-conditional DiT, one file a family, in plain PyTorch."""
