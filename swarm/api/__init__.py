"""`swarm api`: the swarm behind an OpenAI-compatible HTTP API, and a web page that shows the swarm and chats.

`schemas` reads and checks requests and writes OpenAI's response, chunk and error shapes; `engine` runs
generations off the event loop (worker threads) and streams their text back; `swarm_map` is the
swarm's status for the page (`swarm status --json`'s data, cached); `server` is the aiohttp
application: routes, server-sent events, the API key, the page (`page.html`, one file, no build step).
"""
