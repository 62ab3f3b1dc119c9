"""Built-in stages, one module each; ``selfalign.registry`` maps their names to modules."""
