"""Cedar policy decisions for every call the broker mediates.

The Cedar model, built at load from ``cedar_policies/`` and the pinned tools:

- ``User::"<subject>"`` in its token's groups, ``Group::"<name>"``;
- ``Server::"<name>"``, and ``Tool::"<server>.<tool>"`` in its server, with
  the manifest's name, server, privilege, risk, open_world and destructive;
- one generated action per pinned tool, ``Action::"call:<server>.<tool>"`` in
  ``Action::"call_tool"``, whose ``context.input`` is typed from the tool's
  input schema (see ``broker.policy.schema``);
- ``read_resource`` and ``get_prompt`` on a Server; ``sample`` and ``elicit``
  with the Server as principal and the User as resource;
- ``read_report`` on ``Report::"<name>"`` (the broker's reports on its record).
"""

from broker.policy.engine import Decision, PolicyEngine

__all__ = ["Decision", "PolicyEngine"]
