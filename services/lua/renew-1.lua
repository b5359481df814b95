--[[
  Renew leases of requests in flight. Every GPU of a lease is checked before anything changes: a
  lease still whole is extended; one the store forgot (data loss) is re-created when its slots and
  GPUs are still free; one partly taken by another assignment, or released, is lost, and what it
  still held is released.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8..] groups of 8: token, gpus (csv), assignment, slots, queue, model, kind, purpose

  Returns reply() with body { lost tokens... }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local lost = {}
for i = 8, #ARGV, 8 do
  local token, a, n = ARGV[i], ARGV[i + 2], tonumber(ARGV[i + 3])
  local gpus = split(ARGV[i + 1], ',')
  local skey = P .. 'slots:' .. a
  local mine = redis.call('ZSCORE', skey, token) ~= false
  local whole = redis.call('EXISTS', P .. 'rel:' .. token) == 0
  for _, g in ipairs(gpus) do
    local o = redis.call('GET', P .. 'gpu:' .. g)
    if o and o ~= a and used(o) > 0 then whole = false end
  end
  if whole and not mine then
    -- forgotten by the store: re-created where nothing else took its place
    local cap = asg(a)
    if redis.call('EXISTS', P .. 'asg:' .. a) == 0 then
      set_asg(a, n, ARGV[i + 1])
      cap = n
    end
    whole = used(a) + n <= cap
  end
  if whole then
    local exp = NOW + TTL
    redis.call('ZADD', skey, exp, token)
    for k = 2, n do redis.call('ZADD', skey, exp, token .. '/' .. k) end
    slots_changed(a)
    for _, g in ipairs(gpus) do redis.call('SET', P .. 'gpu:' .. g, a, 'PX', TTL) end
    local lkey = P .. 'lease:' .. token
    if redis.call('PEXPIRE', lkey, TTL) == 0 then
      redis.call('HSET', lkey, 'gpus', ARGV[i + 1], 'assignment', a, 'n', n, 'queue', ARGV[i + 4],
        'model', ARGV[i + 5], 'kind', ARGV[i + 6], 'purpose', ARGV[i + 7], 'since', NOW)
      redis.call('PEXPIRE', lkey, TTL)
    end
    note_expiry(a)
  else
    lost[#lost + 1] = token
    if mine then
      redis.call('DEL', P .. 'lease:' .. token)
      drop_slots(token, a, n)
      settle(a, gpus)
    end
  end
end
serve_freed()
return reply(lost)
