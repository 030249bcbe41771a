"""The Lua scripts of the broker: every change of a job that must be atomic (or fenced by
its attempt) is one script, so no crash between two commands can leave a half-written job.

Why scripts and not MULTI: most changes depend on what is there (is the job terminal? is
this still my attempt? do I still own the stream entry?), which MULTI cannot test.
"""

from __future__ import annotations

__all__ = [
    "CANCEL",
    "CLAIM",
    "DEAD",
    "EMIT",
    "EXTEND",
    "FINISH",
    "HEARTBEAT",
    "REQUEUE",
    "START",
    "SUBMIT",
]

_TERMINAL = "(st == 'succeeded' or st == 'failed' or st == 'canceled' or st == 'expired')"

_EVENT = "redis.call('XADD', KEYS[2], 'MAXLEN', '~', '1000', '*', 'kind', %s, 'data', %s)"

_CANCELED_EVENT = _EVENT % ("'status'", """'{"status":"canceled","error":null}'""")
_QUEUED_EVENT = _EVENT % ("'status'", """'{"status":"queued","error":null}'""")
_CANCELING_EVENT = _EVENT % ("'status'", """'{"status":"canceling","error":null}'""")


def _retention(now: str) -> str:
    """Lua setting ``ret`` (the job's retention, s) and ``expires`` (``now`` + it)."""
    return (
        "local ret = tonumber(redis.call('HGET', KEYS[1], 'retention')) or 86400\n"
        f"local expires = tostring(tonumber({now}) + ret)"
    )


SUBMIT = """
-- KEYS: job hash, index, events, pool stream[, idempotency key]
-- ARGV: id, now, retention, idem ttl, idem key, pool, request, metadata, webhook,
--       status event data, expires_at
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[1]} end
if ARGV[5] ~= '' then
  local owner = redis.call('GET', KEYS[5])
  if owner and owner ~= ARGV[1] then return {'reused', owner} end
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'pool', ARGV[6], 'status', 'queued',
  'created_at', ARGV[2], 'started_at', '', 'completed_at', '', 'expires_at', ARGV[11],
  'attempt', '0', 'worker', '', 'token', '', 'finish_token', '', 'request', ARGV[7],
  'metadata', ARGV[8], 'idempotency_key', ARGV[5], 'webhook_url', ARGV[9],
  'outputs', '[]', 'error', '', 'progress', '', 'last_error', '', 'retention', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
-- Index entries outlive their jobs by one retention (listed as expired), then go.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf',
  '(' .. tostring(tonumber(ARGV[2]) - 2 * tonumber(ARGV[3])))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '1000', '*', 'kind', 'status', 'data', ARGV[10])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.pcall('XGROUP', 'CREATE', KEYS[4], 'workers', '0', 'MKSTREAM')
redis.call('XADD', KEYS[4], '*', 'job', ARGV[1])
return {'new', ARGV[1]}
"""

START = f"""
-- KEYS: job hash, events.  ARGV: worker, token, now
if redis.call('EXISTS', KEYS[1]) == 0 then return {{'gone', ''}} end
{_retention("ARGV[3]")}
local st = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then return {{'terminal', st}} end
if st == 'canceling' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', ARGV[3],
    'expires_at', expires)
  redis.call('EXPIRE', KEYS[1], ret)
  {_CANCELED_EVENT}
  redis.call('EXPIRE', KEYS[2], ret)
  return {{'terminal', 'canceled'}}
end
if redis.call('HGET', KEYS[1], 'token') == ARGV[2] then
  return {{'started', redis.call('HGET', KEYS[1], 'attempt')}}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'token', ARGV[2],
  'started_at', ARGV[3], 'expires_at', expires, 'finish_token', '')
redis.call('EXPIRE', KEYS[1], ret)
local data = cjson.encode({{status='running', attempt=attempt, worker=ARGV[1]}})
{_EVENT % ("'status'", "data")}
redis.call('EXPIRE', KEYS[2], ret)
return {{'started', tostring(attempt)}}
"""

EMIT = f"""
-- KEYS: job hash, events.  ARGV: attempt, kind, data
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'canceling' then return 0 end
if ARGV[2] == 'progress' then redis.call('HSET', KEYS[1], 'progress', ARGV[3]) end
{_EVENT % ("ARGV[2]", "ARGV[3]")}
return 1
"""

EXTEND = """
-- KEYS: pool stream, job hash.  ARGV: group, consumer, entry id, attempt
-- Renew the lease (reset the entry's idle time) only while this consumer owns the entry
-- and the job is still on this attempt; answer {owned, status}.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return {0, ''} end
if redis.call('HGET', KEYS[2], 'attempt') ~= ARGV[4] then return {0, ''} end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return {1, redis.call('HGET', KEYS[2], 'status') or ''}
"""

FINISH = f"""
-- KEYS: job hash, events, pool stream
-- ARGV: attempt, token, status, outputs, error, progress, now, entry id, group,
--       status event data, output event data...
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XACK', KEYS[3], ARGV[9], ARGV[8])
  redis.call('XDEL', KEYS[3], ARGV[8])
  return 'gone'
end
{_retention("ARGV[7]")}
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
if redis.call('HGET', KEYS[1], 'finish_token') == ARGV[2] then
  redis.call('XACK', KEYS[3], ARGV[9], ARGV[8])
  redis.call('XDEL', KEYS[3], ARGV[8])
  return redis.call('HGET', KEYS[1], 'status')
end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' and st ~= 'canceling' then return 'stale' end
local status, outputs, err, data = ARGV[3], ARGV[4], ARGV[5], ARGV[10]
if st == 'canceling' then
  status, outputs, err, data = 'canceled', '[]', '', '{{"status":"canceled","error":null}}'
end
redis.call('HSET', KEYS[1], 'status', status, 'outputs', outputs, 'error', err,
  'completed_at', ARGV[7], 'expires_at', expires, 'finish_token', ARGV[2])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[6]) end
redis.call('EXPIRE', KEYS[1], ret)
if status ~= 'canceled' then
  for i = 11, #ARGV do
    {_EVENT % ("'output'", "ARGV[i]")}
  end
end
{_EVENT % ("'status'", "data")}
redis.call('EXPIRE', KEYS[2], ret)
redis.call('XACK', KEYS[3], ARGV[9], ARGV[8])
redis.call('XDEL', KEYS[3], ARGV[8])
return status
"""

REQUEUE = f"""
-- KEYS: job hash, events.  ARGV: attempt, token, now[, why (kept as last_error)]
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
{_retention("ARGV[3]")}
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' and redis.call('HGET', KEYS[1], 'requeue_token') == ARGV[2] then
  return 'queued'  -- a retried call: done already
end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 'stale' end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '', 'token', '',
    'requeue_token', ARGV[2])
  if ARGV[4] and ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[4]) end
  {_QUEUED_EVENT}
  return 'queued'
end
if st == 'canceling' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', ARGV[3],
    'expires_at', expires, 'finish_token', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ret)
  {_CANCELED_EVENT}
  redis.call('EXPIRE', KEYS[2], ret)
  return 'canceled'
end
return 'stale'
"""

CANCEL = f"""
-- KEYS: job hash, events, control.  ARGV: now, job id
-- Answers the job's hash as a flat list (empty: no such job).
if redis.call('EXISTS', KEYS[1]) == 0 then return {{}} end
{_retention("ARGV[1]")}
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', ARGV[1],
    'expires_at', expires)
  redis.call('EXPIRE', KEYS[1], ret)
  {_CANCELED_EVENT}
  redis.call('EXPIRE', KEYS[2], ret)
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'canceling')
  {_CANCELING_EVENT}
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '1000', '*', 'action', 'cancel', 'job', ARGV[2],
    'attempt', redis.call('HGET', KEYS[1], 'attempt'))
end
return redis.call('HGETALL', KEYS[1])
"""

CLAIM = """
-- KEYS: pool stream.  ARGV: group, consumer, min idle (ms), count, key prefix, lease (s)
-- Take up to `count` entries idle for `min idle` ms (their holder stopped renewing its
-- lease); note on the job why it runs again. Answers {entry id, job id, deliveries}...
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local out = {}
for _, p in ipairs(pend) do
  local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1])
  local entry = got[1]
  if entry then
    local fields = entry[2]
    local job = ''
    for i = 1, #fields, 2 do
      if fields[i] == 'job' then job = fields[i + 1] end
    end
    if job ~= '' then
      local hk = ARGV[5] .. ':job:' .. job
      if redis.call('HGET', hk, 'status') == 'running' then
        local w = redis.call('HGET', hk, 'worker') or '?'
        local a = redis.call('HGET', hk, 'attempt') or '?'
        redis.call('HSET', hk, 'last_error', 'attempt ' .. a .. ' on worker ' .. w ..
          ' lost its lease (not renewed for ' .. ARGV[6] .. ' s)')
      end
    end
    table.insert(out, {p[1], job, tostring(p[4] + 1)})
  end
end
return out
"""

DEAD = f"""
-- KEYS: pool stream, dead-letter stream, job hash, events
-- ARGV: group, entry id, job id, deliveries, error text, error JSON, now,
--       status event data, worker
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '10000', '*', 'job', ARGV[3], 'entry', ARGV[2],
  'deliveries', ARGV[4], 'error', ARGV[5], 'worker', ARGV[9], 'at', ARGV[7])
local ret = tonumber(redis.call('HGET', KEYS[3], 'retention')) or 86400
local expires = tostring(tonumber(ARGV[7]) + ret)
local st = redis.call('HGET', KEYS[3], 'status')
if st and not {_TERMINAL} then
  redis.call('HSET', KEYS[3], 'status', 'failed', 'error', ARGV[6], 'completed_at', ARGV[7],
    'expires_at', expires, 'outputs', '[]')
  redis.call('EXPIRE', KEYS[3], ret)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '1000', '*', 'kind', 'status', 'data', ARGV[8])
  redis.call('EXPIRE', KEYS[4], ret)
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

HEARTBEAT = """
-- KEYS: worker hash.  ARGV: ttl (s), field, value, ...
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
