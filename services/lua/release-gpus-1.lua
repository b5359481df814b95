--[[
  Release the reservations on some GPUs (the original API's release by GPU id). The tokens are
  collected first and each released once: a release serves the queues, and a GPU read again
  afterwards could name a reservation granted in this very call. A lease of a request in flight
  is never freed from outside.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  GPU ids, comma-separated

  Returns reply() with body { reservations released, GPUs serving requests in flight (csv) }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local tokens, seen, busy = {}, {}, {}
for _, g in ipairs(split(ARGV[8], ',')) do
  local a = redis.call('GET', P .. 'gpu:' .. g)
  if a and used(a) > 0 then
    for _, s in ipairs(redis.call('ZRANGE', P .. 'slots:' .. a, 0, -1)) do
      local token = string.match(s, '^(.-)/%d+$') or s
      if not seen[token] then
        seen[token] = true
        if redis.call('HGET', P .. 'lease:' .. token, 'purpose') == 'proxy' then
          busy[#busy + 1] = g
        else
          tokens[#tokens + 1] = token
        end
      end
    end
  end
end
local n = 0
for _, token in ipairs(tokens) do
  if release_token(token) > 0 then n = n + 1 end
end
serve_freed()
return reply({ n, table.concat(busy, ',') })
