"""The zoo: typed entries from model_zoo.yaml, architectures, checkpoint files and their exact key maps, the encoder."""
