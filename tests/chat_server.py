"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat format, for tests of every client of it.

`answer` is a string or a function of the request body (so a test can serve a judge that reads the
prompt); `statuses` scripts the status codes of successive requests (the last one repeats).
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, answer, statuses=(200,)):
        self.requests, self.statuses = [], list(statuses)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                if status == 200:
                    content = answer(body) if callable(answer) else answer
                    payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                else:
                    payload = {"error": "scripted failure"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
