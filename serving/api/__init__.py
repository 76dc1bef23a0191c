"""One module per API (chat, completions, responses, tokenize), each over serving.frontend."""
