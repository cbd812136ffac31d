"""HTTP routes, thin: each validates its body (pydantic), calls the state, and shapes the answer."""
