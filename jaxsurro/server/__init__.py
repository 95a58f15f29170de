"""What runs in a server rank: receiver, host buffers, trainer, the online loop, steering, validation."""
