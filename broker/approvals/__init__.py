"""Human approval: tool calls that policy holds for a person to confirm.

- ``model``: a pending action, and the binding an approval is good for;
- ``store``: where pending actions are kept (SQLite), and the wait for one;
- ``store_redis``, ``redis_keys``: the same in Redis, shared by replicas;
- ``gate``: the hook mediation calls, and the approvers' decisions;
- ``api``, ``openapi``: the JSON API under /approvals/api;
- ``signin``, ``page``, ``render``: the web page under /approvals;
- ``webhook``: an announcement of each new pending action;
- ``mount``: all of it put into the broker's app; ``cli``: the command line.
"""
