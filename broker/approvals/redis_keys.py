"""What the approvals keep in Redis: the names of the keys, and the scripts.

The keys, all under the configured prefix (``broker:`` by default)::

    approvals:action:<id>        hash: one action, every field as text
    approvals:status:<status>    sorted set of ids in that status, by creation
    approvals:due                pending and approved ids, by expiry
    approvals:usable:<binding>   approvals recorded and not yet spent for one
                                 binding (hashed, so no subject is a key
                                 name), by creation
    approvals:changed:<id>       pub/sub channel: the action left "pending"

Each script is one change of state, made whole or not at all; none reads
the state in one round trip and writes it in another. Scripts reach action
keys by ids found in an index, which Redis Cluster refuses: like the
record, approvals need one Redis (replicated or not), not a cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from broker.approvals.model import Binding, Status

# KEYS: action, status:pending, due. ARGV: id, created, expires, field, value...
ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('action ' .. ARGV[1] .. ' exists')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
"""

# Undoes an add whose creation was not recorded, whatever happened since.
# KEYS: action, due, usable, then every status index. ARGV: id.
FORGET = """
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
"""

# KEYS: action, status:pending, status:<new>, due.
# ARGV: id, new status, approver, reason, now.
# Returns the decided action, or nil if it was not pending and unexpired.
DECIDE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'expires')
if state[1] ~= 'pending' or tonumber(state[2]) <= tonumber(ARGV[5]) then
  return false
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'approver', ARGV[3],
  'reason', ARGV[4], 'decided', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created'), ARGV[1])
if ARGV[2] ~= 'approved' then
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# A recorded decision takes effect: an approval becomes usable, waiters hear.
# KEYS: action, usable. ARGV: id, channel.
RELEASE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'created')
if state[1] == 'approved' then
  redis.call('ZADD', KEYS[2], state[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], state[1] or 'gone')
"""

# KEYS: action, status:<decided>, status:pending, due. ARGV: id, decided status.
UNDECIDE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'pending', 'reason', '')
redis.call('HDEL', KEYS[1], 'approver', 'decided')
local times = redis.call('HMGET', KEYS[1], 'created', 'expires')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], times[1], ARGV[1])
redis.call('ZADD', KEYS[4], times[2], ARGV[1])
return 1
"""

# Spends the oldest unexpired approval of one binding.
# KEYS: usable, due, status:approved, status:used. ARGV: action key prefix, now.
# Returns the spent action, or nil.
CONSUME = """
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local action = ARGV[1] .. id
  local expires = tonumber(redis.call('ZSCORE', KEYS[2], id))
  if expires and expires > tonumber(ARGV[2])
      and redis.call('HGET', action, 'status') == 'approved' then
    redis.call('HSET', action, 'status', 'used')
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[4], redis.call('HGET', action, 'created'), id)
    return redis.call('HGETALL', action)
  end
end
return false
"""

# KEYS: action, usable, due, status:used, status:approved. ARGV: id.
UNCONSUME = """
if redis.call('HGET', KEYS[1], 'status') ~= 'used' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'approved')
local times = redis.call('HMGET', KEYS[1], 'created', 'expires')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], times[1], ARGV[1])
redis.call('ZADD', KEYS[3], times[2], ARGV[1])
redis.call('ZADD', KEYS[2], times[1], ARGV[1])
return 1
"""

# Marks up to a page of overdue pending and approved actions as expired.
# KEYS: due, status:pending, status:approved, status:expired.
# ARGV: key prefix of the approvals, now, page size.
# Returns the expired actions.
EXPIRE = """
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[2], 'BYSCORE',
  'LIMIT', 0, ARGV[3])
local expired = {}
for _, id in ipairs(due) do
  local action = ARGV[1] .. 'action:' .. id
  local state = redis.call('HMGET', action, 'status', 'created', 'binding')
  redis.call('ZREM', KEYS[1], id)
  if state[1] == 'pending' or state[1] == 'approved' then
    redis.call('HSET', action, 'status', 'expired')
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', ARGV[1] .. 'usable:' .. state[3], id)
    redis.call('ZADD', KEYS[4], state[2], id)
    redis.call('PUBLISH', ARGV[1] .. 'changed:' .. id, 'expired')
    table.insert(expired, redis.call('HGETALL', action))
  end
end
return expired
"""

# KEYS: status:<status>. ARGV: action key prefix, limit. Returns the actions.
LISTED = """
local rows = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  table.insert(rows, redis.call('HGETALL', ARGV[1] .. id))
end
return rows
"""


@dataclass(frozen=True, slots=True)
class ApprovalKeys:
    """The names of the approvals' keys and channels under one prefix."""

    prefix: str

    @property
    def base(self) -> str:
        return f"{self.prefix}approvals:"

    def action(self, action_id: str = "") -> str:
        """One action's hash; without an id, the prefix of every action's."""
        return f"{self.base}action:{action_id}"

    def status(self, status: Status) -> str:
        return f"{self.base}status:{status.value}"

    @property
    def due(self) -> str:
        return f"{self.base}due"

    def usable(self, binding: Binding) -> str:
        return f"{self.base}usable:{binding_key(binding)}"

    def changed(self, action_id: str) -> str:
        return f"{self.base}changed:{action_id}"

    def statuses(self) -> list[str]:
        return [self.status(status) for status in Status]


def binding_key(binding: Binding) -> str:
    """A name for ``binding`` that is the same on every replica and hides it."""
    parts = (
        binding.subject,
        binding.issuer,
        binding.client_id,
        binding.tool,
        binding.digest,
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
