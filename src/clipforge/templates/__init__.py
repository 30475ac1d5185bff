"""Built-in prompt template sets, one template a line: simple.txt, ensemble.txt, corpus.txt, waffle.txt."""
