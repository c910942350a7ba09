"""Small real models for pdv: an MLP, a GPT family, a conv net."""
