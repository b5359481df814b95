--[[
  What every GPU runs and who waits, for /gpu/status. Bounded: the GPUs asked about, at most
  ARGV[9] queues (the most recently active), one lease shown per GPU.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  GPU ids, comma-separated     ARGV[9] most queues to report

  Returns reply() with body { per leased GPU: gpu, assignment, slots used, capacity, token, model,
  purpose, since, ttl ms ...; '--'; queue, depth, arrival of its oldest live waiter ('' when
  not found among the first few) ...; '--'; gpu, holder ... }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

-- The arrival of queue q's oldest waiter still counted in qw: and alive; the entries ahead of it
-- go (a few per call, as for qw:).
local function oldest (q)
  local key, akey = P .. 'qw:' .. q, P .. 'qa:' .. q
  for _ = 1, 8 do
    local h = redis.call('ZRANGE', akey, 0, 0, 'WITHSCORES')
    if #h == 0 then return '' end
    local ok = live(h[1])
    if ok and redis.call('ZSCORE', key, h[1]) then return h[2] end
    if not ok then drop_waiter(h[1]) end
    leave_queue(q, h[1])
  end
  return ''
end

local out = {}
local gpus = split(ARGV[8], ',')
for _, g in ipairs(gpus) do
  local a = redis.call('GET', P .. 'gpu:' .. g)
  if a then
    local n = used(a)
    if n > 0 then
      local cap = asg(a)
      local first = redis.call('ZRANGE', P .. 'slots:' .. a, 0, 0)
      local token = string.match(first[1], '^(.-)/%d+$') or first[1]
      local l = redis.call('HMGET', P .. 'lease:' .. token, 'model', 'purpose', 'since')
      for _, v in ipairs({ g, a, n, cap, token, l[1] or '', l[2] or '', l[3] or '',
        redis.call('PTTL', P .. 'gpu:' .. g) }) do out[#out + 1] = v end
    end
  end
end
out[#out + 1] = '--'
redis.call('ZREMRANGEBYSCORE', P .. 'queues', '-inf', NOW - 3 * TTL)
for _, q in ipairs(redis.call('ZREVRANGE', P .. 'queues', 0, tonumber(ARGV[9]) - 1)) do
  local key = P .. 'qw:' .. q
  expire_queued(q)
  for _, m in ipairs(redis.call('ZRANGE', key, 0, 7)) do
    if not live(m) then drop_waiter(m) leave_queue(q, m) end
  end
  local since = oldest(q)
  local depth = redis.call('ZCARD', key)
  if depth > 0 then
    out[#out + 1] = q
    out[#out + 1] = depth
    out[#out + 1] = since
  end
end
out[#out + 1] = '--'
for _, g in ipairs(gpus) do
  local h = redis.call('GET', P .. 'hold:' .. g)
  if h and hold_valid(h) then
    out[#out + 1] = g
    out[#out + 1] = h
  end
end
local r = { EPOCH, RUN, FLAGS, #out }
for _, v in ipairs(out) do r[#r + 1] = v end
return r
