module fanfare.local/proxybackend

go 1.22
