"""Model families (one file each) and adapters for the language models they drive."""
