"""Parameter-efficient adapter passes and their merge. Importing this package registers them."""
