"""The OpenAI-compatible HTTP server (`functional-llm serve`; needs the `serve` extra).

app.py: routes and streaming over one AsyncLLM; protocol.py: request records and response
shapes; metrics.py: Prometheus metrics; main.py: the command line and uvicorn. Importing this
package imports nothing beyond the standard library: fastapi loads with app.py."""
