"""Ground floor: helpers every stage uses and that import nothing else of the project."""
