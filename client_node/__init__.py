"""The data owner's side: local data, trainers, and the thin Flower ClientApp."""
