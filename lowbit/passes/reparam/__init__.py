"""Weight reparameterization passes (training-time) and their exact fold. Importing this package registers them."""
