--[[
  Slots: an assignment of capacity N runs up to N leases at once; its GPUs belong to it while any
  of them runs. Needs prelude.lua.

  asg:<a>     hash cap, gpus           the assignment as last registered (and q, qt: queue.lua's
                                       note_resident)
  slots:<a>   zset token -> expiry     its live leases (a whole-assignment lease: token, token/2, ...)
  gpu:<g>     string a (PX)            the assignment running on a GPU
  hold:<g>    string member (PX)       GPU kept for a starving waiter
  expiry      zset a -> earliest expiry of its slots (expired slots are found without a scan)
  lease:<t>   hash (PX)                gpus, assignment, n, queue, model, kind, purpose, since
  rel:<t>     (PX)                     released: a late renewal must not revive it
  alist:<a>   set of list ids          the candidate lists holding a
  list:<l> hash pos -> a; lpos:<l> hash a -> pos; free:<l> zset pos -> pos (maybe free, checked on use)
  pk:<g>      hash l -> 'pos,pos...'   free-index entries parked because another assignment ran on g
  gw:<g>      zset l -> arrival        lists that found g in their way, by their next waiter's
                                       arrival (a lower bound, brought up to date when read)

  Constant cost whatever the number of assignments sharing a GPU (one Ollama server serving a
  thousand models is a thousand assignments on one GPU, each its own model's list):
  - A release never enumerates the assignments of its GPUs. Free indexes are lazy: an entry stays
    in free:<l> until an attempt finds it unusable. Found blocked by another assignment running
    on GPU g, it is parked in pk:<g> (and its list noted in gw:<g>). When g frees, a list served
    for it gets its own entries on g back before its try; the rest go back only if g is still
    free when the script ends (each paid for by the attempt that parked it): a GPU handed on at
    once leaves them parked, where no sweep or attempt has to look at them again. Found full (its
    own slots), an entry goes back through alist:<a> when a slot of a frees (a's lists, not g's).
  - A release serves a bounded number of queues: the lists in gw:<g> in the order of their next
    waiter's arrival (oldest first, O(log n) per step), and stops as soon as g is closed again
    (its new assignment has no free slot, or a live hold keeps it for one waiter). A list whose
    waiter still cannot be served leaves gw:<g>: what stopped it (another busy GPU h, a hold, a
    full assignment) noted it where that frees (gw:<h>, alist), unless it was g itself.
  - Lists that never waited cost nothing on a release: their entries in gw:<g> are dropped when
    read (each once per attempt that noted it).
  A GPU freed by a held key's expiry or a hold dropped as stale wakes nobody: the waiters' sweep
  serves their lists (as before), and any attempt on the list does.
]]
local TO_SERVE = {}
local TO_SERVE_SEEN = {}
-- GPUs freed in this call, whose lists in gw:<g> are to be served
local TO_STREAM = {}
local TO_STREAM_SEEN = {}
-- '<g>\n<l>' noted in gw:<g> by this call (a list that failed is kept there only if so)
local NOTED = {}
local DAY = 86400000

-- Assignments read in this call: asg:<a> changes only through set_asg, which forgets it, and
-- note_resident (queue.lua), which keeps the record up to date. The GPU list returned is shared:
-- read it, never change it. One read gives the residency fields too (q, qt: late-binding.lua).
local ASG = {}

local function asg_record (a)
  local r = ASG[a]
  if not r then
    local h = redis.call('HMGET', P .. 'asg:' .. a, 'cap', 'gpus', 'q', 'qt')
    r = { tonumber(h[1]) or 1, split(h[2], ','), h[3] or nil, tonumber(h[4]) or 0 }
    ASG[a] = r
  end
  return r
end

local function asg (a)
  local r = asg_record(a)
  return r[1], r[2]
end

-- The queue whose lease a last ran (nil: none yet)
local function asg_queue (a)
  return asg_record(a)[3]
end

local function set_asg (a, cap, gpus)
  redis.call('HSET', P .. 'asg:' .. a, 'cap', cap, 'gpus', gpus)
  ASG[a] = nil
end

-- Slots in use, per assignment, as counted in this call (NOW does not move within it): a count
-- is read once, and forgotten where this call changes the assignment's slots (take, drop_slots,
-- slots_changed).
local USED = {}

local function used (a)
  local n = USED[a]
  if not n then
    local k = P .. 'slots:' .. a
    redis.call('ZREMRANGEBYSCORE', k, '-inf', NOW)
    n = redis.call('ZCARD', k)
    USED[a] = n
  end
  return n
end

local function slots_changed (a)
  USED[a] = nil
end

local function hold_valid (holder)
  if not alive(holder) then return false end
  local w = redis.call('HMGET', P .. 'w:' .. holder, 'line', 'token')
  return w[1] ~= false and w[2] == false
end

--[[
  Whether assignment a can take `want` more slots ('all' = every slot) for waiter m; holds by other
  live waiters count unless m is nil. Returns ok, then what is in the way ('busy' and the GPU
  another assignment runs on, 'hold' and the GPU, or 'full'), or ok, nil, the slots in use.
]]
local function usable (a, m, want)
  local cap, gpus = asg(a)
  if #gpus == 0 then return false, 'full' end
  local n = used(a)
  if want == 'all' then want = cap end
  if n + (tonumber(want) or 1) > cap then return false, 'full' end
  local held = nil
  for _, g in ipairs(gpus) do
    local o = redis.call('GET', P .. 'gpu:' .. g)
    if o and o ~= a then
      if used(o) > 0 then return false, 'busy', g end
      redis.call('DEL', P .. 'gpu:' .. g)
    end
    if m ~= nil and not held then
      local h = redis.call('GET', P .. 'hold:' .. g)
      if h and h ~= m then
        if hold_valid(h) then held = g else redis.call('DEL', P .. 'hold:' .. g) end
      end
    end
  end
  if held then return false, 'hold', held end
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

local function stream_later (g)
  if not TO_STREAM_SEEN[g] then
    TO_STREAM_SEEN[g] = true
    TO_STREAM[#TO_STREAM + 1] = g
  end
end

-- List l found GPU g in its way; `since` is the arrival of the waiter it was looking for (of the
-- request about to wait): a lower bound of its next waiter's.
local function note_waiting (g, l, since)
  local key = P .. 'gw:' .. g
  redis.call('ZADD', key, 'LT', since, l)
  redis.call('PEXPIRE', key, DAY)
  NOTED[g .. '\n' .. l] = true
end

-- Position pos of list l is blocked by another assignment running on g: out of the free index
-- until g frees.
local function park (g, l, pos, since)
  redis.call('ZREM', P .. 'free:' .. l, pos)
  local key = P .. 'pk:' .. g
  local had = redis.call('HGET', key, l)
  if not had then
    redis.call('HSET', key, l, pos)
  elseif not string.find(',' .. had .. ',', ',' .. pos .. ',', 1, true) then
    redis.call('HSET', key, l, had .. ',' .. pos)
  end
  redis.call('PEXPIRE', key, DAY)
  note_waiting(g, l, since)
end

local function unpark_entries (l, csv)
  local fk = P .. 'free:' .. l
  for _, pos in ipairs(split(csv, ',')) do
    -- (a list gone meanwhile leaves a key that expires)
    if redis.call('ZADD', fk, pos, pos) == 1 then redis.call('PEXPIRE', fk, DAY) end
  end
end

-- GPUs freed in this call (their parked entries are settled at the end)
local FREED_GPUS = {}
local FREED_SEEN = {}

-- List l is about to be served: its entries parked on the GPUs freed in this call go back.
local function unpark_list (l)
  for _, g in ipairs(FREED_GPUS) do
    local key = P .. 'pk:' .. g
    local csv = redis.call('HGET', key, l)
    if csv then
      redis.call('HDEL', key, l)
      unpark_entries(l, csv)
    end
  end
end

-- At the end of a script: the entries parked on a GPU freed in it that nobody took go back.
-- (whether anything is parked is asked first: mostly nothing is, and then the GPU need not be
-- looked at; what is parked is read only for a GPU still free, never for one handed on)
AT_END[#AT_END + 1] = function ()
  for _, g in ipairs(FREED_GPUS) do
    local key = P .. 'pk:' .. g
    if redis.call('EXISTS', key) == 1 then
      local o = redis.call('GET', P .. 'gpu:' .. g)
      if not o or used(o) == 0 then
        local parked = redis.call('HGETALL', key)
        redis.call('DEL', key)
        for i = 1, #parked, 2 do unpark_entries(parked[i], parked[i + 1]) end
      end
    end
  end
end

-- GPU g is free: its waiting lists are to be served, its parked entries go back (see above).
local function gpu_freed (g)
  if not FREED_SEEN[g] then
    FREED_SEEN[g] = true
    FREED_GPUS[#FREED_GPUS + 1] = g
  end
  stream_later(g)
end

-- A slot of a was freed: a goes back into the free indexes of its lists (not every assignment of
-- its GPUs: see the top), and those lists are to be served.
local function freed (a)
  if not usable(a, nil, 1) then return end
  for _, l in ipairs(redis.call('SMEMBERS', P .. 'alist:' .. a)) do
    local pos = redis.call('HGET', P .. 'lpos:' .. l, a)
    if pos then
      redis.call('ZADD', P .. 'free:' .. l, pos, pos)
      serve_later(l)
    else
      redis.call('SREM', P .. 'alist:' .. a, l)
    end
  end
end

-- The slots of a changed (taken, released, expired): its GPUs go when none is left.
local function settle (a, gpus)
  if used(a) == 0 then
    for _, g in ipairs(gpus) do
      local o = redis.call('GET', P .. 'gpu:' .. g)
      if o == a then redis.call('DEL', P .. 'gpu:' .. g) end
      if o == a or not o then gpu_freed(g) end
    end
  end
  note_expiry(a)
  freed(a)
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
  slots_changed(a)
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
  slots_changed(a)
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
