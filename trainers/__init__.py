"""Training loops for clrlab: the explicit compiled GradientTape loop and the model.fit path."""
