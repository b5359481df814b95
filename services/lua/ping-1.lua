--[[
  Renew one lease only while it still exists (reservations, by /gpu/ping).

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  token

  Returns reply() with body { gpus, assignment, queue, model, kind, purpose, slots } or {} when gone
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local token = ARGV[8]
local lkey = P .. 'lease:' .. token
local l = redis.call('HMGET', lkey, 'gpus', 'assignment', 'queue', 'model', 'kind', 'purpose', 'n')
if not l[2] or not redis.call('ZSCORE', P .. 'slots:' .. l[2], token) then
  serve_freed()
  return reply({})
end
local exp = NOW + TTL
local n = tonumber(l[7]) or 1
redis.call('ZADD', P .. 'slots:' .. l[2], 'XX', exp, token)
for k = 2, n do redis.call('ZADD', P .. 'slots:' .. l[2], 'XX', exp, token .. '/' .. k) end
slots_changed(l[2])
for _, g in ipairs(split(l[1], ',')) do redis.call('SET', P .. 'gpu:' .. g, l[2], 'PX', TTL) end
redis.call('PEXPIRE', lkey, TTL)
note_expiry(l[2])
serve_freed()
return reply(l)
