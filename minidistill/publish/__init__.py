"""Publishing a distilled model: the run report, the model card, the Hub push and the GGUF export."""
