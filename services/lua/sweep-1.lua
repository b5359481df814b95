--[[
  Heartbeat and fallback poll in one call: keep this replica's lines and waiters alive, serve
  their lists, report grants already made to its members (lost notifications) and the members the
  store no longer knows (dropped as dead while this replica was cut off: to be queued again).

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  number of lines n, then n lines ('<list id>:<queue>:<want>'), then members

  Returns reply() with body { member, token, index triples..., '--', unknown members... }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local n = tonumber(ARGV[8])
local lists, seen = {}, {}
for i = 9, 8 + n do
  local ln = ARGV[i]
  touch_line(ln)
  local l, q = string.match(ln, '^([^:]+):([^:]+):')
  if q then redis.call('ZADD', P .. 'queues', NOW, q) end
  if l and not seen[l] then
    seen[l] = true
    lists[#lists + 1] = l
    for _, k in ipairs({ 'list:', 'lpos:', 'free:' }) do redis.call('PEXPIRE', P .. k .. l, 86400000) end
  end
end
serve_freed()
serve(lists)
-- models nobody has waited for lately leave the status's index
redis.call('ZREMRANGEBYSCORE', P .. 'queues', '-inf', NOW - 3 * TTL)
local body, unknown = {}, {}
for i = 9 + n, #ARGV do
  local m = ARGV[i]
  local wkey = P .. 'w:' .. m
  local w = redis.call('HMGET', wkey, 'token', 'index', 'line', 'queue')
  if w[1] then
    redis.call('DEL', wkey)
    body[#body + 1] = m
    body[#body + 1] = w[1]
    body[#body + 1] = tostring(w[2])
  elseif w[3] then
    redis.call('PEXPIRE', wkey, LINE_TTL)
    redis.call('ZADD', P .. 'qw:' .. w[4], 'XX', NOW + LINE_TTL, m)
    redis.call('PEXPIRE', P .. 'qw:' .. w[4], LINE_TTL)
    redis.call('PEXPIRE', P .. 'qa:' .. w[4], LINE_TTL)
    redis.call('ZADD', P .. 'allw', 'XX', NOW + LINE_TTL, m)
  else
    unknown[#unknown + 1] = m
  end
end
body[#body + 1] = '--'
for _, m in ipairs(unknown) do body[#body + 1] = m end
return reply(body)
