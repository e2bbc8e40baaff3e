"""The OpenAI-compatible HTTP server (`functional-llm serve`; needs the `serve` extra).

app.py: routes and request checks over one AsyncLLM; respond.py: running a request and
answering it (whole or streamed, client disconnects); protocol.py: request records and response
shapes; metrics.py: Prometheus metrics; main.py: the command line and uvicorn. Importing this
package imports nothing beyond the standard library: fastapi loads with app.py."""
