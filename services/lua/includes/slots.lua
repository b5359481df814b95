--[[
  Slots: an assignment of capacity N runs up to N leases at once; its GPUs belong to it while any
  of them runs. Needs prelude.lua.

  asg:<a>     hash cap, gpus           the assignment as last registered
  slots:<a>   zset token -> expiry     its live leases (a whole-assignment lease: token, token/2, ...)
  gpu:<g>     string a (PX)            the assignment running on a GPU
  hold:<g>    string member (PX)       GPU kept for a starving waiter
  expiry      zset a -> earliest expiry of its slots (expired slots are found without a scan)
  lease:<t>   hash (PX)                gpus, assignment, n, queue, model, kind, purpose, since
  rel:<t>     (PX)                     released: a late renewal must not revive it
  alist:<a>   set of list ids          the candidate lists holding a
  gasg:<g>    set of assignment ids    the assignments on a GPU
  list:<l> hash pos -> a; lpos:<l> hash a -> pos; free:<l> zset pos -> pos (maybe free, checked on use)
]]
local TO_SERVE = {}
local TO_SERVE_SEEN = {}

-- Assignments read in this call: asg:<a> changes only through set_asg, which forgets it. The GPU
-- list returned is shared: read it, never change it.
local ASG = {}

local function asg (a)
  local r = ASG[a]
  if not r then
    local h = redis.call('HMGET', P .. 'asg:' .. a, 'cap', 'gpus')
    r = { tonumber(h[1]) or 1, split(h[2], ',') }
    ASG[a] = r
  end
  return r[1], r[2]
end

local function set_asg (a, cap, gpus)
  redis.call('HSET', P .. 'asg:' .. a, 'cap', cap, 'gpus', gpus)
  ASG[a] = nil
end

local function used (a)
  local k = P .. 'slots:' .. a
  redis.call('ZREMRANGEBYSCORE', k, '-inf', NOW)
  return redis.call('ZCARD', k)
end

local function hold_valid (holder)
  if not alive(holder) then return false end
  local w = redis.call('HMGET', P .. 'w:' .. holder, 'line', 'token')
  return w[1] ~= false and w[2] == false
end

--[[
  Whether assignment a can take `want` more slots ('all' = every slot) for waiter m; holds by other
  live waiters count unless m is nil. Returns ok, 'hold' when only a hold is in the way, and the
  slots in use.
]]
local function usable (a, m, want)
  local cap, gpus = asg(a)
  if #gpus == 0 then return false end
  local n = used(a)
  if want == 'all' then want = cap end
  if n + (tonumber(want) or 1) > cap then return false end
  local held = false
  for _, g in ipairs(gpus) do
    local o = redis.call('GET', P .. 'gpu:' .. g)
    if o and o ~= a then
      if used(o) > 0 then return false end
      redis.call('DEL', P .. 'gpu:' .. g)
    end
    if m ~= nil then
      local h = redis.call('GET', P .. 'hold:' .. g)
      if h and h ~= m then
        if hold_valid(h) then held = true else redis.call('DEL', P .. 'hold:' .. g) end
      end
    end
  end
  if held then return false, 'hold' end
  return true, nil, n
end

local function note_expiry (a)
  local first = redis.call('ZRANGE', P .. 'slots:' .. a, 0, 0, 'WITHSCORES')
  if #first == 0 then redis.call('ZREM', P .. 'expiry', a) else redis.call('ZADD', P .. 'expiry', first[2], a) end
end

local function serve_later (l)
  if not TO_SERVE_SEEN[l] then
    TO_SERVE_SEEN[l] = true
    TO_SERVE[#TO_SERVE + 1] = l
  end
end

-- Slots of a were freed: put a and every assignment sharing its GPUs back into the free indexes
-- of their lists where they are usable now, and note those lists to be served.
local function freed (a, gpus)
  local affected, seen = {}, {}
  if a then affected[1] = a seen[a] = true end
  for _, g in ipairs(gpus) do
    for _, b in ipairs(redis.call('SMEMBERS', P .. 'gasg:' .. g)) do
      if not seen[b] then seen[b] = true affected[#affected + 1] = b end
    end
  end
  for _, b in ipairs(affected) do
    if usable(b, nil, 1) then
      for _, l in ipairs(redis.call('SMEMBERS', P .. 'alist:' .. b)) do
        local pos = redis.call('HGET', P .. 'lpos:' .. l, b)
        if pos then
          redis.call('ZADD', P .. 'free:' .. l, pos, pos)
          serve_later(l)
        else
          redis.call('SREM', P .. 'alist:' .. b, l)
        end
      end
    end
  end
end

-- The slots of a changed (taken, released, expired): its GPUs go when none is left.
local function settle (a, gpus)
  if used(a) == 0 then
    for _, g in ipairs(gpus) do
      if redis.call('GET', P .. 'gpu:' .. g) == a then redis.call('DEL', P .. 'gpu:' .. g) end
    end
  end
  note_expiry(a)
  freed(a, gpus)
end

-- Expired slots (holders that stopped renewing) free their assignments; a few per call.
local function expire_due ()
  local due = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', NOW, 'LIMIT', 0, 16)
  for _, a in ipairs(due) do
    local _, gpus = asg(a)
    settle(a, gpus)
  end
end

-- Lease `want` slots of assignment a to member m; returns the token.
local function take (m, a, want, q, model, kind, purpose)
  local cap, gpus = asg(a)
  local n = want == 'all' and cap or 1
  local token = m .. '#' .. redis.call('INCR', P .. 'fence')
  local exp = NOW + TTL
  local skey = P .. 'slots:' .. a
  redis.call('ZADD', skey, exp, token)
  for k = 2, n do redis.call('ZADD', skey, exp, token .. '/' .. k) end
  -- (a hold of m's on these GPUs is cleared by its caller: a waiter's with its wait, and a new
  -- request has none)
  for _, g in ipairs(gpus) do redis.call('SET', P .. 'gpu:' .. g, a, 'PX', TTL) end
  local lkey = P .. 'lease:' .. token
  redis.call('HSET', lkey, 'gpus', table.concat(gpus, ','), 'assignment', a, 'n', n, 'queue', q,
    'model', model, 'kind', kind, 'purpose', purpose, 'since', NOW)
  redis.call('PEXPIRE', lkey, TTL)
  -- the new slot expires last of all: the earliest expiry changes only if a had none
  redis.call('ZADD', P .. 'expiry', 'LT', exp, a)
  return token
end

-- Remove a lease's slots; returns how many it still had (0: gone already, or never this one's).
local function drop_slots (token, a, n)
  local skey = P .. 'slots:' .. a
  local removed = redis.call('ZREM', skey, token)
  for k = 2, n do removed = removed + redis.call('ZREM', skey, token .. '/' .. k) end
  return removed
end

local function release_token (token)
  local lkey = P .. 'lease:' .. token
  local l = redis.call('HMGET', lkey, 'gpus', 'assignment', 'n')
  redis.call('SET', P .. 'rel:' .. token, '1', 'PX', TTL)
  if not l[2] then return 0 end
  redis.call('DEL', lkey)
  local removed = drop_slots(token, l[2], tonumber(l[3]) or 1)
  if removed > 0 then settle(l[2], split(l[1], ',')) end
  return removed
end
