--[[
  Register a candidate list (one model's assignments in preference order, or a restricted list:
  the server holding an upload, the candidates out of cooldown). Attempts name it by id only.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  list id (a hash of its content)
  ARGV[9]  the list: 'assignment=capacity=gpu,gpu;...'

  Returns reply() with body { number of candidates }
]]
--- @include "includes/prelude"
--- @include "includes/slots"

epoch_check()
local l = ARGV[8]
local lk, lp, fk = P .. 'list:' .. l, P .. 'lpos:' .. l, P .. 'free:' .. l
redis.call('DEL', lk, lp, fk)
local n = 0
for _, c in ipairs(split(ARGV[9], ';')) do
  local a, cap, gpus = string.match(c, '^([^=]+)=(%d+)=(.+)$')
  redis.call('HSET', lk, tostring(n), a)
  redis.call('HSET', lp, a, n)
  set_asg(a, cap, gpus)
  redis.call('SADD', P .. 'alist:' .. a, l)
  -- maybe free: the first attempt that finds it in use drops it (or parks it on the GPU in its way)
  redis.call('ZADD', fk, n, n)
  n = n + 1
end
redis.call('HSET', lk, 'n', n)
for _, k in ipairs({ lk, lp, fk }) do redis.call('PEXPIRE', k, 86400000) end
return reply({ n })
