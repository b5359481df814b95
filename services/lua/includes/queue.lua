--[[
  Waiting: one line per (candidate list, model queue, slots wanted), so that waiters in one line
  all want the same thing and one that cannot be served means none behind it can. Needs
  prelude.lua and slots.lua.

  line:<ln>      zset member -> level * 2^40 + tag   fair order (ln = <list id>:<queue>:<want>)
  age1:<ln>, age2:<ln>  zset member -> arrival       normal and low waiters, for aging
  vt:<ln>        hash v -> start tag last served (the line's clock), c<client> -> client's counter
                 (its last charge, corrected with the server's counts: fair-correct-1.lua),
                 l<client> -> the last tag given to the client (its requests keep their order),
                 x -> when a grant made at once last set its expiry
  lines:<l>      zset ln -> arrival of its next waiter   the lines of list l with waiters
  w:<member>     hash line, list, queue, level, score, since, model, kind, purpose, want, pref,
                 cost, holder, pin, pass (late-binding.lua), held; token, index once granted (PX)
  qw:<queue>     zset member -> expiry     a model's waiters (QUEUE_MAX)
  qa:<queue>     zset member -> arrival    the same waiters by arrival, for the status's oldest
                 wait (kept in step with qw: by leave_queue and expire_queued; PX as qw:)
  allw           zset member -> expiry     every waiter (QUEUE_MAX_TOTAL)
                 (expiry: 3 ttl ahead, pushed on by the waiter's replica's sweep)
  queues         zset queue -> last touch  models with waiters, for the status
  Line keys live 3 ttl unless touched: each replica's sweep touches the lines of its waiters.
]]
local LEVEL = 1099511627776 -- 2^40: tags stay below it
local LINE_TTL = TTL * 3
-- how often, at most, a server taken again for the same queue is moved up res:<q> (note_resident)
local RES_REFRESH_MS = 1000

local function line_keys (ln)
  return P .. 'line:' .. ln, P .. 'age1:' .. ln, P .. 'age2:' .. ln, P .. 'vt:' .. ln
end

--[[
  Fair share by tokens (CONTRACT 16.4), start-time fair queuing: a request starts at its client's
  counter, raised to the line's clock `v` (the start tag last served: an idle client banks
  nothing), and its tag (the line's order) is that start plus its cost; the client's counter
  becomes that tag. Returns the tag and the clock.
]]
local function fair_tag (ln, client, cost, served)
  local vt = P .. 'vt:' .. ln
  local r = redis.call('HMGET', vt, 'v', 'c' .. client, 'l' .. client, 'x')
  local v = tonumber(r[1]) or 0
  local counter = math.max(v, tonumber(r[2]) or 0) + (tonumber(cost) or 1)
  -- A client's own requests keep their arrival order (5.3): a correction that credited its counter
  -- (fair-correct-1.lua) does not put this request before one of its own still in line, whose tag
  -- is at most its last (l), as long as the clock has not passed that.
  local last = tonumber(r[3]) or 0
  local tag = counter
  if last > v and tag <= last then tag = last + 1 end
  local fields = { 'c' .. client, counter, 'l' .. client, tag }
  local refresh = false
  if served then
    -- served at once: the line's clock moves on to its start in the same write
    local start = tag - (tonumber(cost) or 1)
    if start > v then
      fields[#fields + 1] = 'v'
      fields[#fields + 1] = start
    end
    -- and the fair state lives LINE_TTL past its use: its expiry is set again once a third of
    -- that has passed since the last time (x), not at every grant
    if NOW - (tonumber(r[4]) or 0) > LINE_TTL / 3 then
      fields[#fields + 1] = 'x'
      fields[#fields + 1] = NOW
      refresh = true
    end
  end
  redis.call('HSET', vt, unpack(fields))
  if refresh then redis.call('PEXPIRE', vt, LINE_TTL) end
  return tag, v
end

local function touch_line (ln)
  local a, b, c, d = line_keys(ln)
  for _, k in ipairs({ a, b, c, d }) do redis.call('PEXPIRE', k, LINE_TTL) end
end

-- A waiter leaves its model's queue: both of its indexes.
local function leave_queue (q, m)
  redis.call('ZREM', P .. 'qw:' .. q, m)
  redis.call('ZREM', P .. 'qa:' .. q, m)
end

-- The entries of queue q that their replica's sweep stopped keeping alive are gone.
local function expire_queued (q)
  local key = P .. 'qw:' .. q
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', NOW)) do redis.call('ZREM', P .. 'qa:' .. q, m) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', NOW)
end

-- level: the waiter's ('0' high is in no aging index, '1' normal in age1, '2' low in age2); nil: unknown
local function unqueue (m, ln, q, level)
  local lkey, a1, a2 = line_keys(ln)
  redis.call('ZREM', lkey, m)
  if level ~= '0' and level ~= '2' then redis.call('ZREM', a1, m) end
  if level ~= '0' and level ~= '1' then redis.call('ZREM', a2, m) end
  leave_queue(q, m)
  redis.call('ZREM', P .. 'allw', m)
end

-- A waiter's holds end with its wait; what they kept from others is served again.
local function clear_holds (m)
  local gone = {}
  for _, g in ipairs(split(redis.call('HGET', P .. 'w:' .. m, 'heldgpus'), ',')) do
    if redis.call('GET', P .. 'hold:' .. g) == m then
      redis.call('DEL', P .. 'hold:' .. g)
      gone[#gone + 1] = g
    end
  end
  for _, g in ipairs(gone) do stream_later(g) end
end

-- A waiter that is gone (replica dead, record expired, left) leaves every index it is in.
local function drop_waiter (m)
  local w = redis.call('HMGET', P .. 'w:' .. m, 'line', 'queue', 'level')
  if w[1] then
    unqueue(m, w[1], w[2], w[3])
    clear_holds(m)
  end
  redis.call('DEL', P .. 'w:' .. m)
end

local function live (m)
  return alive(m) and redis.call('EXISTS', P .. 'w:' .. m) == 1
end

-- The next waiter of a line: the best (effective level, tag), where a waiter counts one level
-- higher for every AGING it has waited (low: normal, then high). Only the oldest normal and the
-- oldest low waiter can have aged furthest, so only they are looked at. Gone waiters are dropped.
-- Returns the waiter and its arrival.
local function pick (ln)
  local lkey, a1, a2 = line_keys(ln)
  while true do
    local best, bscore = nil, nil
    local h = redis.call('ZRANGE', lkey, 0, 0, 'WITHSCORES')
    if #h == 0 then return nil end
    best, bscore = h[1], tonumber(h[2])
    for lvl, akey in ipairs({ a1, a2 }) do
      local o = redis.call('ZRANGE', akey, 0, 0, 'WITHSCORES')
      local up = #o > 0 and math.min(lvl, AGING > 0 and math.floor((NOW - tonumber(o[2])) / AGING) or lvl) or 0
      if up > 0 then
        local s = redis.call('ZSCORE', lkey, o[1])
        if s then
          s = tonumber(s) - up * LEVEL
          if s < bscore then best, bscore = o[1], s end
        else
          redis.call('ZREM', akey, o[1])
        end
      end
    end
    -- live: its replica is alive and its record is there (whose arrival the line's index needs)
    local since = alive(best) and redis.call('HGET', P .. 'w:' .. best, 'since')
    if since then return best, since end
    local q = redis.call('HGET', P .. 'w:' .. best, 'queue')
    redis.call('ZREM', lkey, best)
    redis.call('ZREM', a1, best)
    redis.call('ZREM', a2, best)
    if q then leave_queue(q, best) end
    redis.call('ZREM', P .. 'allw', best)
    redis.call('DEL', P .. 'w:' .. best)
  end
end

-- Keep list l's index of lines in step with line ln's next waiter; returns that waiter and its arrival.
local function reindex (l, ln)
  local m, since = pick(ln)
  if m then
    redis.call('ZADD', P .. 'lines:' .. l, since, ln)
  else
    redis.call('ZREM', P .. 'lines:' .. l, ln)
  end
  return m, since
end

-- The first usable position of list l for waiter m: its preferred assignments, the one held for
-- it, then the free index in list order (stale entries dropped, those blocked by another
-- assignment's GPU parked there, held ones skipped; what is in the way notes l with `since`, the
-- arrival of m). Returns the position, its assignment and the slots in use there.
local function find (m, l, pref, want, held, since)
  local lpos = P .. 'lpos:' .. l
  for _, a in ipairs(split(pref, ',')) do
    local pos = redis.call('HGET', lpos, a)
    if pos then
      local ok, _, n = usable(a, m, want)
      if ok then return tonumber(pos), a, n end
    end
  end
  if held and held ~= '' then
    local pos = redis.call('HGET', lpos, held)
    if pos then
      local ok, _, n = usable(held, m, want)
      if ok then return tonumber(pos), held, n end
    end
  end
  local fkey = P .. 'free:' .. l
  local skip = 0
  while true do
    local r = redis.call('ZRANGE', fkey, skip, skip + 15)
    if #r == 0 then return nil end
    for _, pos in ipairs(r) do
      local a = redis.call('HGET', P .. 'list:' .. l, pos)
      local ok, why, n = false, nil, nil
      if a then ok, why, n = usable(a, m, want) end
      if ok then return tonumber(pos), a, n end
      if why == 'busy' then
        park(n, l, pos, since)
      elseif why == 'hold' then
        -- only a hold is in the way: it stays free for everyone else
        note_waiting(n, l, since)
        skip = skip + 1
      elseif a and want == 'all' and usable(a, m, 1) then
        -- partly in use: back in every list of a when its slots free
        skip = skip + 1
      else
        redis.call('ZREM', fkey, pos)
      end
    end
  end
end

-- Assignment a's last lease is for queue q: its model is resident there (as far as the store
-- knows: the model of a server's last lease is loaded on it). res:<q> lists them, latest first.
local function note_resident (a, q)
  local r = asg_record(a)
  local old = r[3]
  -- a server taken again for the same queue moves up its list once a second at most (its time
  -- there orders the list: RES_MAX latest are read), not at every grant
  if old == q and NOW - r[4] < RES_REFRESH_MS then return end
  if old and old ~= q then redis.call('ZREM', P .. 'res:' .. old, a) end
  redis.call('HSET', P .. 'asg:' .. a, 'q', q, 'qt', NOW)
  r[3], r[4] = q, NOW
  -- its expiry is set when a server joins the list (not at every take: a call per grant); a list
  -- whose servers all stay in it a whole day lapses once then, and the next take of each begins it again
  if redis.call('ZADD', P .. 'res:' .. q, NOW, a) == 1 then redis.call('PEXPIRE', P .. 'res:' .. q, DAY) end
end

-- Lease position pos of list l (assignment a, n slots in use) to m; returns the token. An
-- assignment left with no free slot leaves the list's free index at once: the next request of
-- the list would otherwise find it there, look at it and drop it.
local function take_at (m, l, pos, a, n, want, q, model, kind, purpose)
  local token = take(m, a, want, q, model, kind, purpose)
  local cap = asg(a)
  if want == 'all' or n + 1 >= cap then redis.call('ZREM', P .. 'free:' .. l, pos) end
  note_resident(a, q)
  return token
end

-- A waiter that has waited STARVE holds the GPUs of one of its first candidates, so they stay
-- free for it as they are released.
local function hold_for (m, l)
  local lk = P .. 'list:' .. l
  local n = math.min(tonumber(redis.call('HGET', lk, 'n')) or 0, 8)
  for pos = 0, n - 1 do
    local a = redis.call('HGET', lk, tostring(pos))
    local _, gpus = asg(a)
    local free = #gpus > 0
    for _, g in ipairs(gpus) do
      local h = redis.call('GET', P .. 'hold:' .. g)
      if h and h ~= m and hold_valid(h) then free = false break end
    end
    if free then
      for _, g in ipairs(gpus) do redis.call('SET', P .. 'hold:' .. g, m, 'PX', TTL) end
      redis.call('HSET', P .. 'w:' .. m, 'held', a, 'heldgpus', table.concat(gpus, ','))
      return
    end
  end
end

-- A waiter's record: list, line, queue, want, pref, held, since, model, kind, purpose, score, level,
-- then late binding's holder, pin, pass (late-binding.lua), then its cost in the fair order
local function waiter_of (m)
  return redis.call('HMGET', P .. 'w:' .. m, 'list', 'line', 'queue', 'want', 'pref', 'held', 'since', 'model', 'kind',
    'purpose', 'score', 'level', 'holder', 'pin', 'pass', 'cost')
end

-- Lease position pos (assignment a, n slots in use) to waiter m, whose record is w; returns the token and pos.
local function grant_at (m, w, pos, a, n)
  local token = take_at(m, w[1], pos, a, n, w[4], w[3], w[8], w[9], w[10])
  unqueue(m, w[2], w[3], w[12])
  clear_holds(m)
  -- the line's clock moves on to the start of what it serves (not its end: one long request
  -- served would otherwise lift every idle client past the waiters it should go between)
  local vt = P .. 'vt:' .. w[2]
  local start = tonumber(w[11]) % LEVEL - (tonumber(w[16]) or 1)
  if start > (tonumber(redis.call('HGET', vt, 'v')) or 0) then redis.call('HSET', vt, 'v', start) end
  local wkey = P .. 'w:' .. m
  redis.call('HSET', wkey, 'token', token, 'index', pos)
  redis.call('PEXPIRE', wkey, TTL)
  return token, pos
end

local function try_grant (m, w)
  w = w or waiter_of(m)
  local pos, a, n = find(m, w[1], w[5], w[4], w[6], w[7])
  if pos then return grant_at(m, w, pos, a, n) end
  if NOW - tonumber(w[7]) >= STARVE then hold_for(m, w[1]) end
  return nil
end

local function note_grant (m, token, pos)
  GRANTS[#GRANTS + 1] = m
  GRANTS[#GRANTS + 1] = token
  GRANTS[#GRANTS + 1] = pos
  -- The calling replica reads its own waiters' grants from the reply; only the others are told.
  if string.sub(m, 1, #REPLICA + 1) ~= REPLICA .. '|' then
    redis.call('PUBLISH', P .. 'events', 'g|' .. m .. '|' .. token .. '|' .. pos)
  end
end

--- @include "includes/late-binding"

-- Serve lists and the waiting lists of GPUs: the line whose next waiter arrived first goes
-- first, until none can be served. The lists to serve are `lists`, those the frees of this call
-- noted (TO_SERVE) and, for each GPU freed (TO_STREAM), the lists of gw:<g> in order, as far as the
-- GPU stays open (see slots.lua). Costs one step per list and GPU named and per grant or failure,
-- whatever the number of lines, candidates or assignments sharing a GPU.
local function serve (lists)
  if PAUSED then return end
  -- nothing named and nothing freed in this call (an attempt granted at once): nothing to serve,
  -- and none of the state below is made (its functions are made anew at every call)
  if #lists == 0 and #TO_SERVE == 0 and #TO_STREAM == 0 then return end
  local heads, named, failed, streams = {}, {}, {}, {}
  local nfailed = 0
  -- The first line of list l, once its place is brought up to date with its next waiter's
  -- arrival: still first when no other line's next waiter came earlier (a tie is asked of the
  -- index). Returns { line, waiter, arrival } or nil.
  local function head (l)
    local key = P .. 'lines:' .. l
    while true do
      local r = redis.call('ZRANGE', key, 0, 1, 'WITHSCORES')
      if #r == 0 then return nil end
      local m, since = reindex(l, r[1])
      if m then
        local s = tonumber(since)
        local second = tonumber(r[4])
        if not second or s < second or (s == second and redis.call('ZRANGE', key, 0, 0)[1] == r[1]) then
          return { r[1], m, s }
        end
      end
    end
  end
  local function name (l)
    if not named[l] and not failed[l] then
      named[l] = true
      heads[l] = head(l)
    end
  end
  -- Whether GPU g is closed to everyone but whom it went to: its assignment has no free slot (or
  -- some, whose lists are then named), or a live hold keeps it (the holder's list is named).
  local function closed (g)
    local o = redis.call('GET', P .. 'gpu:' .. g)
    if o then
      local n = used(o)
      if n > 0 then
        -- (o's entries in its lists may be parked on g from before: they go back)
        if n < asg(o) then freed(o) end
        return true
      end
    end
    local h = redis.call('GET', P .. 'hold:' .. g)
    if h and hold_valid(h) then
      local l = redis.call('HGET', P .. 'w:' .. h, 'list')
      if l then name(l) end
      return true
    end
    return false
  end
  -- A list reached through streams only stays among the heads while some stream is at it.
  local function leave_current (g)
    local cur = streams[g].l
    streams[g].l = nil
    if cur and not named[cur] then
      for _, st in pairs(streams) do if st.l == cur then return end end
      heads[cur] = nil
    end
  end
  -- The next list of gw:<g> not failed in this call, its place brought up to date; none (and the
  -- stream ends) when g is closed or nobody waits for it. The lists failed in this call that are
  -- still there are passed over (at most `nfailed` of them).
  local function advance (g)
    leave_current(g)
    local key = P .. 'gw:' .. g
    -- Nobody waits for g, holds it or has an entry parked on it (mostly so, as a GPU frees): no
    -- stream, and nothing for closed to bring back (an assignment on g with free slots has its
    -- entries in its lists' free indexes unless parked): one call, not three.
    if redis.call('EXISTS', key, P .. 'hold:' .. g, P .. 'pk:' .. g) == 0 then streams[g] = nil return end
    if closed(g) then streams[g] = nil return end
    while true do
      local r = redis.call('ZRANGE', key, 0, nfailed + 1, 'WITHSCORES')
      local l, stored, second = nil, nil, nil
      for i = 1, #r, 2 do
        if not failed[r[i]] then
          if l == nil then l, stored = r[i], tonumber(r[i + 1]) else second = tonumber(r[i + 1]) break end
        end
      end
      if l == nil then streams[g] = nil return end
      local h = heads[l]
      if not named[l] and not h then h = head(l) end
      if not h then
        redis.call('ZREM', key, l)
      else
        if h[3] ~= stored then redis.call('ZADD', key, h[3], l) end
        if h[3] <= stored or not second or h[3] <= second then
          streams[g].l = l
          heads[l] = h
          return
        end
      end
    end
  end
  local function take_new ()
    for _, l in ipairs(lists) do name(l) end
    lists = {}
    local more = TO_SERVE
    TO_SERVE, TO_SERVE_SEEN = {}, {}
    for _, l in ipairs(more) do name(l) end
    local gpus = TO_STREAM
    TO_STREAM, TO_STREAM_SEEN = {}, {}
    for _, g in ipairs(gpus) do
      if not streams[g] then
        streams[g] = {}
        advance(g)
      end
    end
  end
  while true do
    take_new()
    local bl, best = nil, nil
    for l, h in pairs(heads) do
      if best == nil or h[3] < best[3] then bl, best = l, h end
    end
    if bl == nil then break end
    unpark_list(bl)
    local gm, token, pos = serve_list(bl, best[1], best[2])
    if token then
      note_grant(gm, token, pos)
      heads[bl] = head(bl)
    else
      heads[bl] = nil
      failed[bl] = true
      nfailed = nfailed + 1
    end
    local gs = {}
    for g in pairs(streams) do gs[#gs + 1] = g end
    for _, g in ipairs(gs) do
      local st = streams[g]
      if st.l == bl then
        if token then
          if heads[bl] then redis.call('ZADD', P .. 'gw:' .. g, heads[bl][3], bl) end
        elseif not NOTED[g .. '\n' .. bl] then
          -- what stopped it noted it where that frees
          redis.call('ZREM', P .. 'gw:' .. g, bl)
        end
        advance(g)
      elseif token and closed(g) then
        leave_current(g)
        streams[g] = nil
      end
    end
  end
end

-- Serve what the frees of this call made usable.
local function serve_freed ()
  serve({})
end
