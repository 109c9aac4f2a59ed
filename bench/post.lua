-- post.lua: wrk script for http_load.sh. Every request is the same
-- POST /api/v1/messages with a small valid body; the bearer token comes from
-- the TOKEN environment variable so it never shows in a process listing.
-- No response() hook: defining one makes wrk hand every response to Lua,
-- which slows the load generator; wrk already counts non-2xx/3xx replies.
wrk.method = "POST"
wrk.body = '{"to":"+639171234567","message":"bench"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("TOKEN") or "")
